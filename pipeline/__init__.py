"""The pipeline: stages, params, MLflow tracking and the `mae-cli` command. Uses `mae`."""
