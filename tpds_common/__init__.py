"""The bottom layer shared by data_prep and tensorpoly_ds: user-facing errors and exit codes, atomic file
writes, folder locks, free ports, the project logger. It imports neither of them (nor torch), so every
package may import it and no import runs up the layers."""
