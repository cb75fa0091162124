import os

# Tests never reach the network: W&B is disabled unless a test is about logging (it then
# sets WANDB_MODE=offline itself).
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
