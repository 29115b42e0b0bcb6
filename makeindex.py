"""`python makeindex.py ...`, as the user's guide writes it: the `makeindex` command."""
import sys

from laion_nb.makeindex import main

if __name__ == '__main__': sys.exit(main())
