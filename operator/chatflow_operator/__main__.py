from chatflow_operator.cli import main

raise SystemExit(main())
