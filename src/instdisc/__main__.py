from instdisc.cli import main

raise SystemExit(main())
