from ecamp.train.cli import main

raise SystemExit(main())
