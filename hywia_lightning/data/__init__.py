"""LightningDataModules and their text: calibration windows, recovery data, text sources, the model's own samples."""
