"""The ChangeCap `evaluate` module (changecap.py); this file only makes the folder ship with the package."""
