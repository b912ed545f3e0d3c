"""Loading causal LMs (hub ids, local folders, the bundled model), their shapes without weights, and the LightningModule that wraps one."""
