"""Shared test setup: an isolated, offline HF cache (set before huggingface_hub is imported) and test helpers
importable from this folder. Nothing here reaches the network."""
import os
import sys
import tempfile

os.environ['HF_HOME'] = tempfile.mkdtemp(prefix='fdconv-zoo-hf-')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ.pop('HF_HUB_CACHE', None)
sys.path.insert(0, os.path.dirname(__file__))
