package sim

import (
	"os"
	"strconv"
	"time"
)

// Clock scales virtual time: Scale virtual seconds pass per real second.
type Clock struct{ Scale float64 }

// ClockFromEnv reads SHOAL_SIM_TIME_SCALE.
func ClockFromEnv() Clock {
	return Clock{Scale: envFloat("SHOAL_SIM_TIME_SCALE", 1)}
}

// Real converts a virtual duration to the real one to sleep.
func (c Clock) Real(virtual time.Duration) time.Duration {
	if c.Scale <= 0 {
		return virtual
	}
	return time.Duration(float64(virtual) / c.Scale)
}

// Sleep sleeps a virtual duration.
func (c Clock) Sleep(virtual time.Duration) { time.Sleep(c.Real(virtual)) }

func envFloat(name string, def float64) float64 {
	if v, err := strconv.ParseFloat(os.Getenv(name), 64); err == nil && v > 0 {
		return v
	}
	return def
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v >= 0 {
		return v
	}
	return def
}

func fmtInt(n int) string { return strconv.Itoa(n) }
