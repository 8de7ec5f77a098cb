"""`python -m groupdiff_cli ...` (and `accelerate launch -m groupdiff_cli ...`)."""

from groupdiff_cli.cli import main

if __name__ == "__main__":
    main(prog_name="groupdiff")
