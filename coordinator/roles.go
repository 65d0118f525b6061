package coordinator

import (
	"fmt"

	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/spec"
)

// A deployment with roles (spec.Roles) is stored as it was applied and run
// as its roles' deployments, NAME-prefill and NAME-decode: the planner,
// the autoscaler, the router's model list and `shoal get` see those
// (docs/design/pd.md §P7).

// roleInfo is a role's deployment's place in the deployment it came from.
type roleInfo struct {
	parent, role string
	ratio        *spec.RoleRatio
	// decode is the decode role's deployment (a prefill role's ratio
	// bounds it against the decode role's count).
	decode *spec.Deployment
}

// expandRoles replaces every deployment with roles by its roles'
// deployments, and says which records are roles of which.
func expandRoles(recs []*store.DeploymentRecord) ([]*store.DeploymentRecord, map[string]roleInfo) {
	out := make([]*store.DeploymentRecord, 0, len(recs))
	roles := map[string]roleInfo{}
	for _, r := range recs {
		if r.Spec == nil || r.Spec.Roles == nil {
			out = append(out, r)
			continue
		}
		p, d := r.Spec.RoleDeployment(spec.RolePrefill), r.Spec.RoleDeployment(spec.RoleDecode)
		for _, c := range []*spec.Deployment{p, d} {
			out = append(out, &store.DeploymentRecord{Name: c.Name, SpecYAML: r.SpecYAML, PrevSpecYAML: r.PrevSpecYAML, Spec: c, Created: r.Created, Updated: r.Updated})
			roles[c.Name] = roleInfo{parent: r.Name, role: c.Engine.KVTransfer.Role, ratio: r.Spec.Roles.Ratio, decode: d}
		}
	}
	return out, roles
}

// deployments is the store's deployments as they run (roles expanded).
func (c *Coordinator) deployments() ([]*store.DeploymentRecord, error) {
	recs, err := c.store.Deployments()
	if err != nil {
		return nil, err
	}
	out, roles := expandRoles(recs)
	c.mu.Lock()
	c.roles = roles
	c.mu.Unlock()
	return out, nil
}

// deployment is one deployment as it runs, by name: a stored one, or a
// role of one.
func (c *Coordinator) deployment(name string) (*store.DeploymentRecord, error) {
	recs, err := c.deployments()
	if err != nil {
		return nil, err
	}
	for _, r := range recs {
		if r.Name == name {
			return r, nil
		}
	}
	return nil, fmt.Errorf("deployment %q: %w", name, store.ErrNotFound)
}

// roleOf says whether name is a role's deployment, and of what.
func (c *Coordinator) roleOf(name string) (roleInfo, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ri, ok := c.roles[name]
	return ri, ok
}
