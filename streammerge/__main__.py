from streammerge.cli import main

main()
