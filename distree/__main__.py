from distree.cli import main

main()
