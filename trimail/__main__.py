from trimail.cli import main

main()
