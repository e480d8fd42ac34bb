"""`python -m reasonguard` (also what `accelerate launch -m reasonguard` runs)."""

from reasonguard.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
