from shuffler.cli import main

main()
