from imagelake.cli import main

main()  # ends the process with the command's exit code
