#!/usr/bin/env python3
from xlabml.manage import main

if __name__ == "__main__":
    main()
