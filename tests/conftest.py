import sys
from pathlib import Path

# let test modules share their fixtures' helpers (test_attention uses test_sampling's)
sys.path.insert(0, str(Path(__file__).resolve().parent))
