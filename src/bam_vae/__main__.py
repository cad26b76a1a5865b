from bam_vae.cli import app

app(prog_name="bam")
