package spec

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"strings"
)

// Roles makes one deployment a disaggregated model: a prefill role and a
// decode role, each its own replica groups with its own parallelism,
// nodes, and replicas (fixed or autoscaled), sharing the model, the engine
// and its KV connector (docs/design/pd.md §P7). The coordinator runs each
// role as a deployment of its own, named NAME-prefill and NAME-decode.
type Roles struct {
	Prefill Role `yaml:"prefill" json:"prefill"`
	Decode  Role `yaml:"decode" json:"decode"`
	// Ratio bounds the autoscaled prefill replicas per decode replica.
	Ratio *RoleRatio `yaml:"ratio,omitempty" json:"ratio,omitempty"`
}

// Role is what one role changes of the deployment.
type Role struct {
	Engine      *RoleEngine  `yaml:"engine,omitempty" json:"engine,omitempty"`
	Resources   *Resources   `yaml:"resources,omitempty" json:"resources,omitempty"`
	Replicas    Replicas     `yaml:"replicas" json:"replicas"`
	Autoscaling *Autoscaling `yaml:"autoscaling,omitempty" json:"autoscaling,omitempty"`
}

// RoleEngine is a role's own engine parallelism; its args are added to
// engine.args and its env merged over engine.env.
type RoleEngine struct {
	TensorParallelSize   int               `yaml:"tensorParallelSize,omitempty" json:"tensorParallelSize,omitempty"`
	PipelineParallelSize int               `yaml:"pipelineParallelSize,omitempty" json:"pipelineParallelSize,omitempty"`
	DataParallel         *DataParallel     `yaml:"dataParallel,omitempty" json:"dataParallel,omitempty"`
	ExpertParallel       *ExpertParallel   `yaml:"expertParallel,omitempty" json:"expertParallel,omitempty"`
	Args                 []string          `yaml:"args,omitempty" json:"args,omitempty"`
	Env                  map[string]string `yaml:"env,omitempty" json:"env,omitempty"`
}

// RoleRatio bounds prefill replicas ÷ decode replicas.
type RoleRatio struct {
	Min float64 `yaml:"min,omitempty" json:"min,omitempty"`
	Max float64 `yaml:"max,omitempty" json:"max,omitempty"`
}

// roleSuffixLen is len("-prefill"): a role's name is the deployment's
// plus its role.
const roleSuffixLen = 8

// RoleName is the name of role's deployment.
func RoleName(parent, role string) string { return parent + "-" + role }

// RoleDeployment is role's deployment of d (which has roles): d with the
// role's engine parallelism, resources and replicas, its kvTransfer role
// set, defaults applied. It is a deployment like any other, validated on
// its own by Validate.
func (d *Deployment) RoleDeployment(role string) *Deployment {
	var c Deployment
	b, _ := json.Marshal(d)
	_ = json.Unmarshal(b, &c)
	r := d.Roles.Prefill
	if role == RoleDecode {
		r = d.Roles.Decode
	}
	c.Name, c.Roles = RoleName(d.Name, role), nil
	c.Replicas, c.Autoscaling = r.Replicas, r.Autoscaling
	e := r.Engine
	if r.Resources != nil || (e != nil && (e.TensorParallelSize > 0 || e.PipelineParallelSize > 0 || e.DataParallel != nil)) {
		// The role's own shape: its parallelism replaces the deployment's,
		// what it leaves out is derived from its resources.
		c.Engine.TensorParallelSize, c.Engine.PipelineParallelSize, c.Engine.DataParallel = 0, 0, nil
		if e != nil {
			c.Engine.TensorParallelSize, c.Engine.PipelineParallelSize = e.TensorParallelSize, e.PipelineParallelSize
			if e.DataParallel != nil {
				dp := *e.DataParallel
				c.Engine.DataParallel = &dp
			}
		}
	}
	if r.Resources != nil {
		c.Resources = *r.Resources
	}
	if e != nil {
		if e.ExpertParallel != nil {
			ep := *e.ExpertParallel
			c.Engine.ExpertParallel = &ep
		}
		c.Engine.Args = append(c.Engine.Args, e.Args...)
		if len(e.Env) > 0 {
			if c.Engine.Env == nil {
				c.Engine.Env = map[string]string{}
			}
			maps.Copy(c.Engine.Env, e.Env)
		}
	}
	if c.Engine.KVTransfer == nil {
		c.Engine.KVTransfer = &KVTransfer{}
	}
	c.Engine.KVTransfer.Role = role
	if role == RoleDecode && c.Engine.Kind == EngineSGLang {
		c.Engine.KVTransfer.BootstrapPort = 0 // the prefill engine's
	}
	c.Default()
	return &c
}

// validateRoles checks a deployment with roles: what only it may say, then
// each role's deployment as any deployment is checked (its errors named
// roles.<role>: …), then the pair (CheckPair).
func validateRoles(d *Deployment) []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &Error{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	if len(d.Name) > MaxNameLen-roleSuffixLen {
		bad("name", "%q is too long for a deployment with roles (at most %d characters: its roles are %s and %s)", d.Name, MaxNameLen-roleSuffixLen,
			RoleName(d.Name, RolePrefill), RoleName(d.Name, RoleDecode))
	}
	if d.Replicas != (Replicas{}) || d.Autoscaling != nil {
		bad("replicas", "a deployment with roles sets replicas and autoscaling per role (roles.prefill.replicas, roles.decode.replicas)")
	}
	k := d.Engine.KVTransfer
	switch {
	case k == nil:
		bad("engine.kvTransfer", "is required with roles: the connector the prefill and decode engines share ({connector: nixl} for vLLM, mooncake or nixl for SGLang)")
	case k.Role != "":
		bad("engine.kvTransfer.role", "is set by each role; leave it out with roles")
	}
	if r := d.Roles.Ratio; r != nil {
		switch {
		case r.Min < 0 || r.Max < 0 || (r.Max > 0 && r.Min > r.Max):
			bad("roles.ratio", "needs 0 ≤ min ≤ max, got min %g, max %g", r.Min, r.Max)
		case d.Roles.Prefill.Autoscaling == nil:
			bad("roles.ratio", "bounds the autoscaled prefill replicas: set roles.prefill.autoscaling")
		}
	}
	if len(errs) > 0 || k == nil {
		return errs
	}
	children := map[string]*Deployment{}
	for _, role := range []string{RolePrefill, RoleDecode} {
		c := d.RoleDeployment(role)
		children[role] = c
		if err := c.Validate(); err != nil {
			for _, e := range unwrapJoined(err) {
				var fe *Error
				if errors.As(e, &fe) {
					errs = append(errs, &Error{Field: "roles." + role + ": " + fe.Field, Msg: fe.Msg})
					continue
				}
				errs = append(errs, fmt.Errorf("roles.%s: %w", role, e))
			}
		}
	}
	if len(errs) > 0 {
		return errs
	}
	if err := CheckPair(children[RolePrefill], children[RoleDecode]); err != nil {
		errs = append(errs, &Error{Field: "roles", Msg: strings.TrimPrefix(err.Error(), ErrInvalid.Error()+": ")})
	}
	return errs
}

// unwrapJoined is the errors joined in err (Validate's), or err.
func unwrapJoined(err error) []error {
	var out []error
	var walk func(error)
	walk = func(e error) {
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, x := range j.Unwrap() {
				walk(x)
			}
			return
		}
		if e != ErrInvalid {
			out = append(out, e)
		}
	}
	walk(err)
	return out
}

// String is the bound as describe shows it: "0.5–2", "≥ 1", "≤ 2".
func (r *RoleRatio) String() string {
	switch {
	case r.Max == 0:
		return fmt.Sprintf("≥ %g", r.Min)
	case r.Min == 0:
		return fmt.Sprintf("≤ %g", r.Max)
	}
	return fmt.Sprintf("%g–%g", r.Min, r.Max)
}

// RoleDesired bounds the autoscaled prefill count p by ratio against the
// decode count dc: ceil(min × dc) ≤ p ≤ floor(max × dc), and at least one
// prefill replica while decode has any. Without decode replicas, p stands.
func RoleDesired(p, dc int, ratio *RoleRatio) int {
	if ratio == nil || dc <= 0 {
		return p
	}
	lo := int(math.Ceil(ratio.Min*float64(dc) - 1e-9)) // 1e-9: 0.1 × 30 is 3, not 4
	if p < lo {
		p = lo
	}
	if ratio.Max > 0 {
		if hi := max(1, int(ratio.Max*float64(dc)+1e-9)); p > hi {
			p = hi
		}
	}
	return max(p, 1)
}
