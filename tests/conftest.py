"""Shared test setup: tests import helpers from this folder and never reach the network."""
import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(__file__))
