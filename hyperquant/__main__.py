from hyperquant.cli import main

main()
