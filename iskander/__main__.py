import sys

if len(sys.argv) > 1 and sys.argv[1] == "score":
    # the batch-scoring client: a separate command that imports no server code
    from iskander.scoring.cli import main as score_main

    score_main(args=sys.argv[2:], prog_name="python -m iskander score")
else:
    from iskander.cli import main

    main(prog_name="python -m iskander")
