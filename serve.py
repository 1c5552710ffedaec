#!/usr/bin/env python3
from xlabml.serve.cli import main

if __name__ == "__main__":
    main()
