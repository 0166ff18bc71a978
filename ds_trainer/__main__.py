import sys

from ds_trainer.cli import main

sys.exit(main())
