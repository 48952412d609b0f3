from memexport.cli import main

main()
