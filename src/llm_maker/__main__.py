from llm_maker.cli import main

raise SystemExit(main())
