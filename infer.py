#!/usr/bin/env python3
from xlabml.infer_cli import main

if __name__ == "__main__":
    main()
