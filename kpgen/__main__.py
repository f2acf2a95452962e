from kpgen.cli import main

main(prog_name="kpgen")
