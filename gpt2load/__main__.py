import sys

from gpt2load.cli.main import main

sys.exit(main())
