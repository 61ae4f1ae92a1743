from t2t_vit.cli import main

raise SystemExit(main())
