from castore.cli import main

raise SystemExit(main())
