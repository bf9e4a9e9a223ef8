from genfan.cli import main

main()
