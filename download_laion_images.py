"""`python download_laion_images.py ...`, as the user's guide writes it: the `download_laion_images` command."""
import sys

from laion_nb.cli import main

if __name__ == '__main__': sys.exit(main())
