"""Everything that turns a batch of jobs into pixels. Imports neither service nor training."""
