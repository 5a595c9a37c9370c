"""Makes the repository root importable and keeps TensorFlow off any GPU."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
