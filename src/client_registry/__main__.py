from client_registry.cli import main

raise SystemExit(main())
