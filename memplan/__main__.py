from memplan.cli.entry import main

main()
