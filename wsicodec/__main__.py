from wsicodec.cli import app

app(prog_name="wsicodec")
