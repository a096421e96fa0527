from authz_service.cli import main

raise SystemExit(main())
