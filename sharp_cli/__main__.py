from sharp_cli.cli import main

main()
