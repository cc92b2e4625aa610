from trimail.entry import main

main()
