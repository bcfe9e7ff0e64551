from viaduct.cli.main import main

raise SystemExit(main())
