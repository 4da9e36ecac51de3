"""The algorithm: PRIME's formulas (`core`), the implicit PRM (`prm`), one PRIME step (`step`) and the few
collective operations they need (`distributed`). Nothing here knows about TRL or Lightning."""
