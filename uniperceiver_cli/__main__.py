from uniperceiver_cli.cli.app import main

main()
