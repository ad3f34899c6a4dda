from kleidi.cli import main

main()
