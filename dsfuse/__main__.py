from dsfuse.cli import main

main()
