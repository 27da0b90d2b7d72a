"""Data sets vggspec writes as image folders from data that ships with scikit-learn (nothing downloaded):
`digits` (the 1797 8 x 8 scans, upsampled) and `scenes` (one digit per cluttered scene, at varying scale).
Each is written whole into a staging folder and moved into place, by one writer at a time.

They need numpy, Pillow and scikit-learn (the `train` extra), never torch.
"""
