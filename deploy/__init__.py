"""How arbitrage runs: the local model server (vLLM) and the deployment files beside this package."""
