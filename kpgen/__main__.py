from kpgen.cli.main import main

main(prog_name="kpgen")
