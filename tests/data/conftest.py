"""Data tests never wait on the network: the hub is offline (set before ``datasets`` is imported)."""
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
